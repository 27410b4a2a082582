-- GCRA update for queueguard rate limits, atomic per call.
-- KEYS[i]: a rate-limit key.  ARGV[1]: now, microseconds since the epoch.
-- ARGV[i + 1]: the increment for KEYS[i], microseconds (events x interval).
-- Each key holds its theoretical arrival time (TAT) and expires shortly after
-- the TAT passes: an expired key and a fresh one mean the same thing.
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  tat = tat + tonumber(ARGV[i + 1])
  redis.call('SET', key, string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
end
return #KEYS
