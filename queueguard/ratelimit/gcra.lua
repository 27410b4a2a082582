-- GCRA state for queueguard rate limits: one atomic call per decision (the same arithmetic as
-- queueguard/ratelimit/gcra.py). Each key holds its theoretical arrival time (TAT) and expires one
-- second after the TAT passes: an expired key and a fresh one mean the same thing.
-- Times are microseconds since the epoch. ARGV[1]: the operation, ARGV[2]: now.
--   reserve    per key 3 args: interval, tolerance (burst x interval), gate (1: being over this
--              limit refuses the recipient). Unless a gate key is over its limit, every key takes
--              one event. Returns {reserved (1/0), tat_1, wait_1, tat_2, wait_2, ...} (tat 0: none).
--   refund     per key 1 arg: interval. One event back, if the TAT is still ahead. Returns {tat_i}.
--   reconcile  per key 2 args: floor, increment. tat = max(tat, now, floor) + increment: what a
--              host admitted while it could not reach this Redis. Returns {tat_i}.
local op, now = ARGV[1], tonumber(ARGV[2])

local function store(key, tat)
  if tat > now then
    redis.call('SET', key, string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
  else
    redis.call('DEL', key)
  end
end

local out = {}
if op == 'reserve' then
  local tats, waits, blocked = {}, {}, false
  for i, key in ipairs(KEYS) do
    local tat = tonumber(redis.call('GET', key)) or now
    if tat < now then tat = now end
    local a = 3 * i
    local over = tat + tonumber(ARGV[a]) - now - tonumber(ARGV[a + 1])
    if over > 0 then
      waits[i] = over
      if ARGV[a + 2] == '1' then blocked = true end
    else
      waits[i] = 0
    end
    tats[i] = tat
  end
  out[1] = blocked and 0 or 1
  for i, key in ipairs(KEYS) do
    local tat = tats[i]
    if not blocked then
      tat = tat + tonumber(ARGV[3 * i])
      store(key, tat)
    elseif tat <= now then
      tat = 0
    end
    out[2 * i] = tat
    out[2 * i + 1] = waits[i]
  end
elseif op == 'refund' then
  for i, key in ipairs(KEYS) do
    local tat = tonumber(redis.call('GET', key)) or 0
    if tat > now then
      tat = tat - tonumber(ARGV[2 + i])
      store(key, tat)
    end
    if tat <= now then tat = 0 end
    out[i] = tat
  end
elseif op == 'reconcile' then
  for i, key in ipairs(KEYS) do
    local tat = tonumber(redis.call('GET', key)) or now
    local floor = tonumber(ARGV[1 + 2 * i])
    if tat < now then tat = now end
    if tat < floor then tat = floor end
    tat = tat + tonumber(ARGV[2 + 2 * i])
    store(key, tat)
    out[i] = tat
  end
else
  return redis.error_reply('unknown operation ' .. tostring(op))
end
return out
