-- Takes an address out of circulation. ARGV[3] ip, [4] owner.
-- A free address leaves the free set at once; an allocated one stays with its owner and is kept
-- aside when released; one not yet in the pool is kept aside when the worker adds it.
local missing = missing_node_or_pool()
if missing then return fail(missing) end
local now = now_ms()
local ip, owner = ARGV[3], ARGV[4]
redis.call('HSET', K_EXCLUDED, ip, owner)
free_remove(family_of(ip), ip)
return ok({}, now)
