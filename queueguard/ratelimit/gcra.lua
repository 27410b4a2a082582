-- GCRA state for queueguard rate limits (the same arithmetic as queueguard/ratelimit/gcra.py).
-- Each key holds its theoretical arrival time (TAT) and expires one second after the TAT passes:
-- an expired key and a fresh one mean the same thing. Times are microseconds since the epoch.
--
-- One call carries a batch of operations (the decisions asked for during one round trip): ARGV[i]
-- is operation i, its words separated by spaces; KEYS are the operations' keys, in order. The
-- script runs atomically, so each decision is too: nothing else happens between its check and
-- its update. Operations ("op now n" then n groups of numbers, one group per key):
--   r now n {interval tolerance gate floor}  reserve: unless a gate key (gate 1: being over this
--       limit refuses the recipient) is over its limit, every key takes one event. A key this
--       Redis has no entry for starts from `floor` (the TAT the caller last saw here; 0: none), so
--       a Redis that restarted empty or evicted the key does not hand out a fresh burst. Reply
--       "reserved(1/0) tat wait tat wait ..." (tat 0: none; wait 0: within the limit).
--   f now n {interval}  refund: one event back if the TAT is still ahead. Reply "tat tat ...".
--       The key keeps its lifetime (at 0 if nothing is left ahead): other hosts may still hold
--       the TAT from before the refund as their floor, and must not put it back.
--   c now n {floor increment}  reconcile: tat = max(tat, now, floor) + increment (what a host
--       admitted while it could not reach this Redis). Reply "tat tat ...".
-- The reply is one string, operation i's answer on line i.

local function store(key, tat, now)
  if tat > now then
    redis.call('SET', key, string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
  else
    redis.call('DEL', key)
  end
end

local function current(key, now, floor)
  local stored = redis.call('GET', key)
  local tat = tonumber(stored) or now
  if not stored and floor and floor > tat then tat = floor end
  if tat < now then tat = now end
  return tat
end

local replies, k = {}, 0
for i, spec in ipairs(ARGV) do
  local a = {}
  for word in string.gmatch(spec, '%S+') do a[#a + 1] = tonumber(word) or word end
  local op, now, n = a[1], a[2], a[3]
  local out = {}
  if op == 'r' then
    local tats, waits, blocked = {}, {}, false
    for j = 1, n do
      local b = 4 * j
      local tat = current(KEYS[k + j], now, a[b + 3])
      local over = tat + a[b] - now - a[b + 1]
      if over > 0 then
        waits[j] = over
        if a[b + 2] == 1 then blocked = true end
      else
        waits[j] = 0
      end
      tats[j] = tat
    end
    out[1] = blocked and '0' or '1'
    for j = 1, n do
      local tat = tats[j]
      if not blocked then
        tat = tat + a[4 * j]
        store(KEYS[k + j], tat, now)
      elseif tat <= now then
        tat = 0
      end
      out[2 * j] = string.format('%d', tat)
      out[2 * j + 1] = string.format('%d', waits[j])
    end
  elseif op == 'f' then
    for j = 1, n do
      local key = KEYS[k + j]
      local tat = tonumber(redis.call('GET', key)) or 0
      if tat > now then
        tat = tat - a[3 + j]
        -- The entry keeps the lifetime the TAT before the refund gave it, whatever is left of it
        -- (0 when nothing is): other hosts may hold that TAT as their floor, and an entry that
        -- expired early would let one put it back.
        redis.call('SET', key, tat > now and string.format('%d', tat) or '0', 'KEEPTTL')
      end
      if tat <= now then tat = 0 end
      out[j] = string.format('%d', tat)
    end
  elseif op == 'c' then
    for j = 1, n do
      local key = KEYS[k + j]
      local tat = current(key, now)
      local floor = a[2 + 2 * j]
      if tat < floor then tat = floor end
      tat = tat + a[3 + 2 * j]
      store(key, tat, now)
      out[j] = string.format('%d', tat)
    end
  else
    return redis.error_reply('unknown operation ' .. tostring(op))
  end
  replies[i] = table.concat(out, ' ')
  k = k + n
end
return table.concat(replies, '\n')
