-- Takes free, cooled-down addresses out of circulation so the worker can unassign them: once
-- reserved, an address is never handed out, so it cannot be in use when it leaves the cloud.
-- ARGV[3] family ("4"/"6"), [4] interface id ("" = any), [5] count, [6] reservation id,
-- [7] fencing token, [8] an IPv4 /28 prefix to reserve whole ("" = single addresses by count).
local missing = missing_node_or_pool()
if missing then return fail(missing) end
if stale_token(ARGV[7]) then return fail('STALE_FENCING_TOKEN') end
local now = now_ms()
local f, iface, count, rid, prefix = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[8] or ''
local taken = {}
if prefix ~= '' then
  -- All 16 addresses or none: each must be free and out of the reuse cooldown (one in use or cooling
  -- could still carry a workload's traffic when the prefix leaves the cloud).
  local held_by = redis.call('HGET', K_PREFIXES, prefix)
  if not held_by or (iface ~= '' and held_by ~= iface) then return fail('PREFIX_NOT_IN_POOL') end
  local ips = prefix_ips(prefix)
  local scores = redis.call('ZMSCORE', K_FREE['4'], unpack(ips))
  for i = 1, PREFIX_SIZE do
    if not scores[i] then return fail('PREFIX_IN_USE', {ip = ips[i]}) end
  end
  for i = 1, PREFIX_SIZE do
    if tonumber(scores[i]) > now - COOLDOWN_MS then return fail('PREFIX_COOLING_DOWN', {ip = ips[i]}) end
  end
  redis.call('ZREM', K_FREE['4'], unpack(ips))
  redis.call('ZADD', K_PFREE, 0, prefix)
  local marks = {}
  for _, ip in ipairs(ips) do
    marks[#marks + 1] = ip
    marks[#marks + 1] = rid
  end
  redis.call('HSET', K_RESERVED['4'], unpack(marks))
  taken = ips
elseif count > 0 then
  for _, ip in ipairs(redis.call('ZRANGEBYSCORE', K_FREE[f], '-inf', now - COOLDOWN_MS)) do
    -- Single addresses only (kept in K_ADDRS): a prefix's address leaves the cloud only with its prefix.
    local held_by = redis.call('HGET', K_ADDRS[f], ip)
    if held_by and (iface == '' or held_by == iface) then
      redis.call('ZREM', K_FREE[f], ip)
      redis.call('HSET', K_RESERVED[f], ip, rid)
      taken[#taken + 1] = ip
      if #taken >= count then break end
    end
  end
end
if #taken > 0 then
  local r = {ms = now, family = f, ips = taken}
  if prefix ~= '' then r.prefix = prefix end
  redis.call('HSET', K_RESERVATIONS, rid, cjson.encode(r))
end
return ok({ips = taken, prefix = prefix}, now)
