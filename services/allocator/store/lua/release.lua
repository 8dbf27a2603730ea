-- Releases by address or by owner. ARGV[3] "ip" or "owner", [4] the value.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
local now = now_ms()
local mode, value = ARGV[3], ARGV[4]
local released = {}
if mode == 'ip' then
  if not release_ip(value, now) then return fail('IP_NOT_ALLOCATED') end
  released[1] = value
else
  local ips = words(redis.call('HGET', K_OWNERS, value))
  if #ips == 0 then return fail('OWNER_NOT_FOUND') end
  for _, ip in ipairs(ips) do
    if release_ip(ip, now) then released[#released + 1] = ip end
  end
end
return ok({released = released}, now)
