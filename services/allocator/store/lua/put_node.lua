-- Creates or updates a node. ARGV[3] "create"/"update", [4] spec (protobuf bytes),
-- [5] pre_allocate, [6] min_allocate, [7] max_allocate, [8] max_above_watermark,
-- [9] release excess (0/1), [10] IPv6 enabled (0/1), [11] first interface index.
local exists = redis.call('EXISTS', K_NODE) == 1
if ARGV[3] == 'create' and exists then return fail('NODE_ALREADY_EXISTS') end
if ARGV[3] == 'update' and not exists then return fail('NODE_NOT_FOUND') end
local now = now_ms()
redis.call('HSET', K_NODE, 'spec', ARGV[4], 'pre_allocate', ARGV[5], 'min_allocate', ARGV[6], 'max_allocate', ARGV[7],
           'max_above_watermark', ARGV[8], 'release_excess', ARGV[9], 'ipv6_enabled', ARGV[10],
           'first_interface_index', ARGV[11])
if not exists then redis.call('HSET', K_NODE, 'created_ms', now) end
redis.call('SADD', K_POOLS, POOL)
return ok({}, now)
