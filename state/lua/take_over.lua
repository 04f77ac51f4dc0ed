-- The take-over record of an app id (workers/takeover.py), read and written alone.
-- KEYS[1]: the record's key. ARGV[1]: the claim of the deployment taking over (its record
-- without offsets). ARGV[2]: the record to write: that claim, or the claim with the offsets its
-- hand-over starts from.
-- Writes ARGV[2] when nothing is recorded or only this claim; returns what is recorded then.
local recorded = redis.call('GET', KEYS[1])
if recorded == false or recorded == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return recorded
