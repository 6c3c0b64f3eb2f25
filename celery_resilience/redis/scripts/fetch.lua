-- The atomic fetch: pop the next message and record it, in one step.
--
-- KEYS: the queue lists in kombu's BRPOP order, then unacked, unacked_index, the worker's
--       in-flight hash, the quarantine list and the owners zset.
-- ARGV: the unacked_index score (kombu scores with the client's clock), the fetching
--       channel's id, the worker's owner name.
-- Returns {list, payload, 1} for a recorded message, {list, payload, 0} for one it could
-- not read (moved to quarantine: kombu would have lost it), or nil.
-- The owner is registered here too (if its heartbeat has not yet been): a worker killed
-- before its first heartbeat still has its messages recovered.
local n = #KEYS - 5
local unacked, index, held, quarantine = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], KEYS[n + 4]
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, payload = pcall(cjson.decode, item)
    local props = ok and type(payload) == 'table' and payload['properties']
    local info = type(props) == 'table' and props['delivery_info']
    local tag = type(props) == 'table' and props['delivery_tag']
    local ex = type(info) == 'table' and info['exchange']
    local rk = type(info) == 'table' and info['routing_key']
    local plain = function(v) return type(v) == 'string' or v == cjson.null end
    if type(tag) ~= 'string' or not plain(ex) or not plain(rk) then
      redis.call('LPUSH', quarantine, item)
      return {KEYS[i], item, 0}
    end
    -- kombu's QoS.append writes dumps([payload, exchange, routing_key]); the payload
    -- goes in as the bytes it was, never re-encoded.
    redis.call('HSET', unacked, tag,
               '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
    redis.call('ZADD', index, ARGV[1], tag)
    redis.call('HSET', held, tag, ARGV[2])
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[n + 5], 'NX', tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[3])
    return {KEYS[i], item, 1}
  end
end
return nil
