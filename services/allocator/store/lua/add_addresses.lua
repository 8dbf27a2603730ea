-- Adds addresses the worker attached (and read back from the cloud) to the pool; creates the pool.
-- ARGV[3] interface id, [4] interface JSON, [5] VPC CIDRs (space-separated, "" = keep),
-- [6] max interfaces, [7] IPv4 per interface (0 = keep), [8] fencing token, [9] prefixes: IPv4 /28s and
-- at most one IPv6 /80 (space-separated, canonical), [10..] addresses.
if redis.call('EXISTS', K_NODE) == 0 then return fail('NODE_NOT_FOUND') end
local iface = ARGV[3]
local prefixes, prefix6_new = {}, nil
for _, p in ipairs(words(ARGV[9])) do
  if string.find(p, ':', 1, true) then prefix6_new = p else prefixes[#prefixes + 1] = p end
end
-- Checked before anything is written: a prefix never overlaps a single address of the pool, nor a
-- known prefix on another interface (the cloud assigns neither); a pool holds one /80.
if prefix6_new then
  local held = redis.call('HGET', K_PREFIX6, 'cidr')
  if held and held ~= prefix6_new then return fail('IPV6_PREFIX_HELD', {prefix = held}) end
  if held then prefix6_new = nil end  -- known: skipped
end
for _, p in ipairs(prefixes) do
  local held_by = redis.call('HGET', K_PREFIXES, p)
  if held_by and held_by ~= iface then return fail('PREFIX_OVERLAPS', {prefix = p}) end
  if not held_by then
    for _, ip in ipairs(prefix_ips(p)) do
      if redis.call('HEXISTS', K_ADDRS['4'], ip) == 1 then return fail('PREFIX_OVERLAPS', {prefix = p}) end
    end
  end
end
for i = 10, #ARGV do
  if family_of(ARGV[i]) == '4' and prefix_of(ARGV[i]) then return fail('PREFIX_OVERLAPS', {prefix = slash28(ARGV[i])}) end
end
if stale_token(ARGV[8]) then return fail('STALE_FENCING_TOKEN') end
local now = now_ms()
redis.call('SADD', K_POOLS, POOL)
if ARGV[5] ~= '' then redis.call('HSET', K_NODE, 'vpc_cidrs', ARGV[5]) end
if tonumber(ARGV[6]) > 0 then redis.call('HSET', K_NODE, 'max_ifaces', ARGV[6]) end
if tonumber(ARGV[7]) > 0 then redis.call('HSET', K_NODE, 'ipv4_per_iface', ARGV[7]) end
-- A new prefix's addresses enter together; one allocated before (lost, and attached again) stays its owner's.
local added_prefixes = {}
for _, p in ipairs(prefixes) do
  if redis.call('HSETNX', K_PREFIXES, p, iface) == 1 then
    prefixes_held = true
    redis.call('HSET', K_NODE, 'prefixes', '1')
    local free = {}
    for _, ip in ipairs(prefix_ips(p)) do
      if redis.call('HEXISTS', K_ALLOC['4'], ip) == 1 then
        redis.call('HDEL', K_LOST, ip)
      elseif redis.call('HEXISTS', K_EXCLUDED, ip) == 0 then
        free[#free + 1] = 0
        free[#free + 1] = ip
      end
    end
    if #free > 0 then redis.call('ZADD', K_FREE['4'], unpack(free)) end
    redis.call('ZADD', K_PFREE, #free / 2, p)
    added_prefixes[#added_prefixes + 1] = p
  end
end
if prefix6_new then
  local g = ipv6_groups(string.match(prefix6_new, '^(.*)/80$'))
  local head = {}
  for i = 1, 5 do head[i] = string.format('%x', g[i]) end
  redis.call('HSET', K_PREFIX6, 'cidr', prefix6_new, 'head', table.concat(head, ':'), 'iface', iface,
             'next', 1, 'held', 0)
  -- Its addresses still allocated (lost when it left the cloud before) are their owners' again.
  prefix6_read = nil
  for _, ip in ipairs(redis.call('HKEYS', K_ALLOC['6'])) do
    if redis.call('HEXISTS', K_ADDRS['6'], ip) == 0 and prefix6_of(ip) then
      redis.call('HDEL', K_LOST, ip)
      redis.call('HINCRBY', K_PREFIX6, 'held', 1)
    end
  end
  redis.call('HSET', K_NODE, 'prefixes', '1')
  added_prefixes[#added_prefixes + 1] = prefix6_new
end
local added = {}
for i = 10, #ARGV do
  local ip = ARGV[i]
  local f = family_of(ip)
  if redis.call('HEXISTS', K_ADDRS[f], ip) == 0 then
    redis.call('HSET', K_ADDRS[f], ip, iface)
    if redis.call('HEXISTS', K_ALLOC[f], ip) == 1 then
      redis.call('HDEL', K_LOST, ip)  -- a lost address attached again: its owner's once more, not free
    elseif redis.call('HEXISTS', K_EXCLUDED, ip) == 0 then
      redis.call('ZADD', K_FREE[f], 0, ip)
    end
    added[#added + 1] = ip
  end
end
-- The interface table lists every address the interface holds (merged with what was known).
if iface ~= '' then
  local info = cjson.decode(ARGV[4])
  local known = redis.call('HGET', K_IFACES, iface)
  local old = known and cjson.decode(known) or {}
  local function merged(...)
    local held, seen = {}, {}
    for i = 1, select('#', ...) do
      local source = select(i, ...)
      if type(source) == 'table' then
        for _, v in ipairs(source) do
          if not seen[v] then seen[v] = true; held[#held + 1] = v end
        end
      end
    end
    return held
  end
  info.addresses = merged(old.addresses, info.addresses, {unpack(ARGV, 10)})
  info.ipv4_prefixes = merged(old.ipv4_prefixes, info.ipv4_prefixes, prefixes)
  redis.call('HSET', K_IFACES, iface, cjson.encode(info))
  redis.call('HSET', K_IFINFO, iface, (info.mac or '') .. '\t' .. tostring(info.device_index or 0) .. '\t' ..
             (info.gateway_ip or '') .. '\t' .. (info.subnet_cidr or '') .. '\t' ..
             (info.gateway_ipv6 or '') .. '\t' .. (info.subnet_ipv6_cidr or ''))
end
return ok({added = added, added_prefixes = added_prefixes}, now)
