-- Cancels a reservation: every reserved address still attached returns to the free set (unless it
-- was excluded meanwhile). ARGV[3] reservation id, [4] fencing token.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
if stale_token(ARGV[4]) then return fail('STALE_FENCING_TOKEN') end
local now = now_ms()
local raw = redis.call('HGET', K_RESERVATIONS, ARGV[3])
if not raw then return fail('RESERVATION_NOT_FOUND') end
local restored = {}
for _, ip in ipairs(cjson.decode(raw).ips) do
  local f = family_of(ip)
  if redis.call('HDEL', K_RESERVED[f], ip) == 1 and restore_free(ip, f) then restored[#restored + 1] = ip end
end
redis.call('HDEL', K_RESERVATIONS, ARGV[3])
return ok({restored = restored}, now)
