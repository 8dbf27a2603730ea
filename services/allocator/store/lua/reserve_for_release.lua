-- Takes free, cooled-down addresses out of circulation so the worker can unassign them: once
-- reserved, an address is never handed out, so it cannot be in use when it leaves the cloud.
-- ARGV[3] family ("4"/"6"), [4] interface id ("" = any), [5] count, [6] reservation id,
-- [7] fencing token.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
if stale_token(ARGV[7]) then return fail('STALE_FENCING_TOKEN') end
local now = now_ms()
local f, iface, count, rid = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local taken = {}
if count > 0 then
  for _, ip in ipairs(redis.call('ZRANGEBYSCORE', K_FREE[f], '-inf', now - COOLDOWN_MS)) do
    if iface == '' or redis.call('HGET', K_ADDRS[f], ip) == iface then
      redis.call('ZREM', K_FREE[f], ip)
      redis.call('HSET', K_RESERVED[f], ip, rid)
      taken[#taken + 1] = ip
      if #taken >= count then break end
    end
  end
end
if #taken > 0 then
  redis.call('HSET', K_RESERVATIONS, rid, cjson.encode({ms = now, family = f, ips = taken}))
end
return ok({ips = taken}, now)
