-- Gives back blocks ARGV[3..] of cluster CIDR ARGV[1] held by owner ARGV[2]: each becomes free to be
-- carved again (lowest first). A block the owner does not hold is left as it is. Answers the indexes
-- given back.
-- KEYS: [1] zset of the CIDR's free blocks given back, [2] hash index -> owner, [3] set "cidr|index"
-- of the owner's blocks.
local cidr, owner = ARGV[1], ARGV[2]
local given = {}
for i = 3, #ARGV do
  local index = ARGV[i]
  if redis.call('HGET', KEYS[2], index) == owner then
    redis.call('HDEL', KEYS[2], index)
    redis.call('SREM', KEYS[3], cidr .. '|' .. index)
    redis.call('ZADD', KEYS[1], tonumber(index), index)
    given[#given + 1] = tonumber(index)
  end
end
return given
