-- Forget an owner that holds nothing. KEYS[1]: the owners zset; KEYS[2]: the owner's
-- in-flight hash; ARGV[1]: the owner.
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
