-- A worker's heartbeat, in Redis's own clock, so that workers on hosts with skewed
-- clocks agree on who is silent. KEYS[1]: the owners zset; ARGV[1]: the owner.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
return tostring(now)
