-- Sliding-window burst counts: for each key (a hash, field = bucket number),
-- add one to the current bucket, drop buckets older than the window, return the sum.
-- ARGV[1] = current bucket, ARGV[2] = buckets per window, ARGV[3] = TTL in ms.
local current = tonumber(ARGV[1])
local oldest = current - tonumber(ARGV[2]) + 1
local ttl = tonumber(ARGV[3])
local counts = {}
for i, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, ARGV[1], 1)
  local fields = redis.call('HGETALL', key)
  local total = 0
  for j = 1, #fields, 2 do
    local bucket = tonumber(fields[j])
    if bucket < oldest then
      redis.call('HDEL', key, fields[j])
    else
      total = total + tonumber(fields[j + 1])
    end
  end
  redis.call('PEXPIRE', key, ttl)
  counts[i] = total
end
return counts
