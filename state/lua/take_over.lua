-- The take-over record of an app id (workers/takeover.py), read and written alone.
-- KEYS[1]: the record's key. ARGV[1]: what to do. ARGV[2]: the caller's claim (its record
-- without offsets, with a token of its own).
--   claim    ARGV[3] the claim's time to live (ms): write the claim when nothing is recorded
--   record   ARGV[3] the record with the offsets the hand-over starts from: write it when
--            the caller's claim is what is recorded
--   release  delete the caller's claim when it is what is recorded
-- Returns what is recorded then (nil: nothing).
local recorded = redis.call('GET', KEYS[1])
if ARGV[1] == 'claim' then
  if recorded == false then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return ARGV[2]
  end
elseif recorded == ARGV[2] then
  if ARGV[1] == 'record' then
    redis.call('SET', KEYS[1], ARGV[3])
    return ARGV[3]
  end
  redis.call('DEL', KEYS[1])
  return false
end
return recorded
