-- Ends a reservation: the addresses the worker unassigned leave the pool, the rest return to it
-- (those excluded meanwhile stay out of the free set). A reserved prefix leaves whole (with its 16
-- addresses) when it was unassigned: no address named, or any of its addresses named; else it returns.
-- ARGV[3] reservation id, [4] fencing token, [5..] the unassigned addresses (none = all of the
-- reservation).
local missing = missing_node_or_pool()
if missing then return fail(missing) end
if stale_token(ARGV[4]) then return fail('STALE_FENCING_TOKEN') end
local now = now_ms()
local raw = redis.call('HGET', K_RESERVATIONS, ARGV[3])
if not raw then return fail('RESERVATION_NOT_FOUND') end
local r = cjson.decode(raw)
local gone = {}
if #ARGV >= 5 then
  for i = 5, #ARGV do gone[ARGV[i]] = true end
else
  for _, ip in ipairs(r.ips) do gone[ip] = true end
end
local released, restored = {}, {}
if type(r.prefix) == 'string' then
  local unassigned = false
  for _, ip in ipairs(r.ips) do unassigned = unassigned or gone[ip] or false end
  if unassigned then
    redis.call('HDEL', K_RESERVED['4'], unpack(r.ips))
    redis.call('HDEL', K_PREFIXES, r.prefix)
    redis.call('ZREM', K_PFREE, r.prefix)
    released = r.ips
  else
    for _, ip in ipairs(r.ips) do
      redis.call('HDEL', K_RESERVED['4'], ip)
      if restore_free(ip, '4') then restored[#restored + 1] = ip end
    end
  end
else
  for _, ip in ipairs(r.ips) do
    local f = family_of(ip)
    redis.call('HDEL', K_RESERVED[f], ip)
    if gone[ip] then
      redis.call('HDEL', K_ADDRS[f], ip)
      released[#released + 1] = ip
    elseif restore_free(ip, f) then  -- still attached: back to the pool (unless excluded meanwhile)
      restored[#restored + 1] = ip
    end
  end
end
redis.call('HDEL', K_RESERVATIONS, ARGV[3])
return ok({released = released, restored = restored}, now)
