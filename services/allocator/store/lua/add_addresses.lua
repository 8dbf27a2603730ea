-- Adds addresses the worker attached (and read back from the cloud) to the pool; creates the pool.
-- ARGV[3] interface id, [4] interface JSON, [5] VPC CIDRs (space-separated, "" = keep),
-- [6] max interfaces, [7] IPv4 per interface (0 = keep), [8] fencing token, [9..] addresses.
if redis.call('EXISTS', K_NODE) == 0 then return fail('NODE_NOT_FOUND') end
if stale_token(ARGV[8]) then return fail('STALE_FENCING_TOKEN') end
local now = now_ms()
local iface = ARGV[3]
redis.call('SADD', K_POOLS, POOL)
if ARGV[5] ~= '' then redis.call('HSET', K_NODE, 'vpc_cidrs', ARGV[5]) end
if tonumber(ARGV[6]) > 0 then redis.call('HSET', K_NODE, 'max_ifaces', ARGV[6]) end
if tonumber(ARGV[7]) > 0 then redis.call('HSET', K_NODE, 'ipv4_per_iface', ARGV[7]) end
local added = {}
for i = 9, #ARGV do
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
  local held, seen = {}, {}
  for _, source in ipairs({known and cjson.decode(known).addresses or {}, info.addresses or {}}) do
    if type(source) == 'table' then
      for _, ip in ipairs(source) do
        if not seen[ip] then seen[ip] = true; held[#held + 1] = ip end
      end
    end
  end
  for i = 9, #ARGV do
    if not seen[ARGV[i]] then seen[ARGV[i]] = true; held[#held + 1] = ARGV[i] end
  end
  info.addresses = held
  redis.call('HSET', K_IFACES, iface, cjson.encode(info))
  redis.call('HSET', K_IFINFO, iface, (info.mac or '') .. '\t' .. tostring(info.device_index or 0) .. '\t' ..
             (info.gateway_ip or '') .. '\t' .. (info.subnet_cidr or '') .. '\t' ..
             (info.gateway_ipv6 or '') .. '\t' .. (info.subnet_ipv6_cidr or ''))
end
return ok({added = added}, now)
