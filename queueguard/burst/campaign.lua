-- Link one message to its campaign and count it, atomically (the rules of campaign.py; window.py's
-- MemoryWindow.link_now is the same in Python). Keys under P = ARGV[1]:
--   P..'k:'..key  -> up to LINK_DEPTH variant ids, newest first, joined by ',' (LSH bands, shape, signals)
--   P..'v:'..vid  -> hash s=signature n=copies c=campaign
--   P..'c:'..cid  -> hash f=first seen v=variants g=signals m=merged into, b<N>=count of bucket N
-- Every key written gets a TTL of one window (ARGV[6] ms), so state lives as long as the wave.
-- ARGV: prefix, signature, now, current bucket, buckets per window, ttl ms, new variant id,
--       new campaign id, SAME, SIMILAR, REPEATS, PENDING, LINK_DEPTH, n, n variant keys, then (signal name, key)
--       pairs. A variant's p field keeps 'vid|signal' resemblances from before it repeated.
-- Returns {campaign id, first seen, count in window, variants, signals joined by ','}.
local P, sig, now = ARGV[1], ARGV[2], ARGV[3]
local current, nb, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local new_vid, new_cid = ARGV[7], ARGV[8]
local same_t, similar_t, repeats = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local max_pending, depth, nvk = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local vkeys, skeys = {}, {}
for i = 1, nvk do vkeys[i] = ARGV[14 + i] end
for i = 15 + nvk, #ARGV - 1, 2 do table.insert(skeys, {ARGV[i], ARGV[i + 1]}) end

local function similarity(a, b)
  if #a == 0 or #a ~= #b then return 0 end
  local eq = 0
  for j = 1, #a, 2 do
    if string.sub(a, j, j + 1) == string.sub(b, j, j + 1) then eq = eq + 1 end
  end
  return eq / (#a / 2)
end

local function root(cid)
  for _ = 1, 16 do
    local m = redis.call('HGET', P .. 'c:' .. cid, 'm')
    if not m then return cid end
    cid = m
  end
  return cid
end

local function ids(key)
  local out = {}
  for vid in string.gmatch(redis.call('GET', P .. 'k:' .. key) or '', '[^,]+') do table.insert(out, vid) end
  return out
end

local found, seenv = {}, {}
for _, k in ipairs(vkeys) do
  for _, vid in ipairs(ids(k)) do
    local v = nil
    if not seenv[vid] then
      seenv[vid] = true
      v = redis.call('HMGET', P .. 'v:' .. vid, 's', 'n', 'c')
    end
    if v and v[2] then
      local vs, why = v[1] or '', nil
      if #sig == 0 and #vs == 0 then
        why = 'shape'
      else
        local j = similarity(sig, vs)
        if j >= same_t then why = 'text' elseif j >= similar_t then why = 'similar-text' end
      end
      if why then table.insert(found, {vid, why, tonumber(v[2]), v[3]}) end
    end
  end
end
for _, sk in ipairs(skeys) do
  for _, vid in ipairs(ids(sk[2])) do
    local v = redis.call('HMGET', P .. 'v:' .. vid, 'n', 'c')
    if v[1] then table.insert(found, {vid, sk[1], tonumber(v[1]), v[2]}) end
  end
end

local own, own_copies, own_new = nil, 0, true
for _, f in ipairs(found) do
  if (f[2] == 'text' or f[2] == 'shape') and f[3] > own_copies then own, own_copies = f[1], f[3] end
end
if own then own_copies, own_new = own_copies + 1, false else own, own_copies = new_vid, 1 end

local VK = P .. 'v:' .. own
local pending, known = {}, {}
for item in string.gmatch(redis.call('HGET', VK, 'p') or '', '[^,]+') do
  table.insert(pending, item); known[item] = true
end
for _, f in ipairs(found) do
  local item = f[1] .. '|' .. f[2]
  if f[2] ~= 'text' and f[2] ~= 'shape' and f[1] ~= own and not known[item] then
    table.insert(pending, item); known[item] = true
  end
end
while #pending > max_pending do table.remove(pending, 1) end
local links = {}
for _, f in ipairs(found) do
  if f[1] ~= own or f[2] == 'text' or f[2] == 'shape' then table.insert(links, f) end
end
for _, item in ipairs(pending) do
  local vid, why = string.match(item, '([^|]+)|(.+)')
  local v = redis.call('HMGET', P .. 'v:' .. vid, 'n', 'c')
  if v[1] then table.insert(links, {vid, why, tonumber(v[1]), v[2]}) end
end

local camps, order, signals = {}, {}, {}
for _, f in ipairs(links) do
  if f[2] == 'text' or f[2] == 'shape' or (own_copies >= repeats and f[3] >= repeats) then
    local c = root(f[4])
    if redis.call('EXISTS', P .. 'c:' .. c) == 1 then
      if not camps[c] then camps[c] = true; table.insert(order, c) end
      signals[f[2]] = true
    end
  end
end
if #order == 0 then
  redis.call('HSET', P .. 'c:' .. new_cid, 'f', now, 'v', 0)
  table.insert(order, new_cid)
end

local target, tfirst = nil, nil
for _, c in ipairs(order) do
  local f = tonumber(redis.call('HGET', P .. 'c:' .. c, 'f'))
  if not target or f < tfirst or (f == tfirst and c < target) then target, tfirst = c, f end
end
local TK = P .. 'c:' .. target
for _, c in ipairs(order) do
  if c ~= target then
    local CK = P .. 'c:' .. c
    local h = redis.call('HGETALL', CK)
    for j = 1, #h, 2 do
      local name, val = h[j], h[j + 1]
      if string.sub(name, 1, 1) == 'b' then
        redis.call('HINCRBY', TK, name, val)
        redis.call('HDEL', CK, name)
      elseif name == 'v' then
        redis.call('HINCRBY', TK, 'v', val)
      elseif name == 'g' then
        for s in string.gmatch(val, '[^,]+') do signals[s] = true end
      end
    end
    redis.call('HSET', CK, 'm', target)
    redis.call('PEXPIRE', CK, ttl)
  end
end

if own_new then
  redis.call('HINCRBY', TK, 'v', 1)
  redis.call('HSET', VK, 's', sig)
end
redis.call('HSET', VK, 'n', own_copies, 'c', target, 'p', table.concat(pending, ','))
redis.call('PEXPIRE', VK, ttl)

redis.call('HINCRBY', TK, 'b' .. current, 1)
local g = redis.call('HGET', TK, 'g')
if g then for s in string.gmatch(g, '[^,]+') do signals[s] = true end end
local list = {}
for s in pairs(signals) do table.insert(list, s) end
table.sort(list)
redis.call('HSET', TK, 'g', table.concat(list, ','))
local oldest, total = current - nb + 1, 0
local h = redis.call('HGETALL', TK)
for j = 1, #h, 2 do
  local name = h[j]
  if string.sub(name, 1, 1) == 'b' then
    if tonumber(string.sub(name, 2)) < oldest then
      redis.call('HDEL', TK, name)
    else
      total = total + tonumber(h[j + 1])
    end
  end
end
redis.call('PEXPIRE', TK, ttl)
local function point(key)
  local list = {own}
  for _, vid in ipairs(ids(key)) do
    if vid ~= own and #list < depth then table.insert(list, vid) end
  end
  redis.call('SET', P .. 'k:' .. key, table.concat(list, ','), 'PX', ttl)
end
for _, k in ipairs(vkeys) do point(k) end
for _, sk in ipairs(skeys) do point(sk[2]) end
return {target, redis.call('HGET', TK, 'f'), total, tonumber(redis.call('HGET', TK, 'v')), table.concat(list, ',')}
