-- Reads a pool's counts and its node's sizing (no change).
local missing = missing_node_or_pool()
if missing then return fail(missing) end
return ok({}, now_ms())
