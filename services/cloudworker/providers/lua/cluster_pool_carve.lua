-- Carves ARGV[3] blocks of cluster CIDR ARGV[1] (ARGV[2] blocks in all) for owner ARGV[4], all or
-- none, lowest free block first: a block given back before (KEYS[3], by index) goes before one
-- never carved (KEYS[2]'s cursor). Block 0 is never carved: it holds the CIDR's network and gateway
-- addresses. Answers the indexes carved; an empty answer when fewer are free; -1 when the CIDR is
-- not registered.
-- KEYS: [1] hash cidr -> block length (the registered CIDRs), [2] hash cidr -> next block never
-- carved, [3] zset of the CIDR's free blocks given back (score = index), [4] hash index -> owner
-- (the CIDR's carved blocks), [5] set "cidr|index" of the owner's blocks.
local cidr, total, count, owner = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
if redis.call('HEXISTS', KEYS[1], cidr) == 0 then return -1 end
local cursor = tonumber(redis.call('HGET', KEYS[2], cidr) or '1')
if redis.call('ZCARD', KEYS[3]) + (total - cursor) < count then return {} end
local carved = {}
for _ = 1, count do
  local index
  local given_back = redis.call('ZPOPMIN', KEYS[3])
  if given_back[1] then
    index = tonumber(given_back[1])
  else
    index = cursor
    cursor = cursor + 1
  end
  redis.call('HSET', KEYS[4], index, owner)
  redis.call('SADD', KEYS[5], cidr .. '|' .. index)
  carved[#carved + 1] = index
end
redis.call('HSET', KEYS[2], cidr, cursor)
return carved
