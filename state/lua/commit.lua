-- KEYS[1..n]: memory keys, then (one server only) m partition fence keys and the outside-writes
-- counter. ARGV[1]: TTL in ms (0: none). ARGV[2]: n. ARGV[3]: m. ARGV[i + 3]: the new value of
-- KEYS[i]; ARGV[n + j + 3]: the batch's highest offset in the partition of KEYS[n + j], in
-- decimal. Returns one code per memory key (``CommitResult``): 1 applied, 0 stale, 2 moved.
-- When a stored value is not a memory of ours, nothing is written and its keys get -1. A key
-- may repeat: each occurrence is compared with the fences the previous one left. A partition
-- fence only grows, whatever was applied: an over-estimate only costs a later batch the fast
-- commit. A write that gives a stored memory a fence on another partition (or a new memory
-- fences on several) counts itself as an outside write: its other partitions' owners may have
-- started from the memory without it. Later writes on those partitions need not: an owner that
-- starts from the memory again reads them all.
local n, m = tonumber(ARGV[2]), tonumber(ARGV[3])
local stored, foreign = {}, false
for i = 1, n do
  local key = KEYS[i]
  if stored[key] == nil then
    local head = redis.call('GETRANGE', key, 0, STATES_HEADER - 1)  -- not the 1 KB of states
    if head == '' and redis.call('EXISTS', key) == 0 then stored[key] = false
    elseif ours(head) then
      local tail = ''
      if more_fences(head) then tail = redis.call('GETRANGE', key, memories_end(head), -1) end
      stored[key] = fences(head, tail)
    else stored[key] = 'foreign'; foreign = true end
  end
end
local codes = {}
if foreign then
  for i = 1, n do codes[i] = stored[KEYS[i]] == 'foreign' and -1 or 0 end
  return codes
end
local function compare(new, old)
  local newer, missing = false, false
  for p, o in pairs(old) do
    local x = new[p]
    if not x or x[1] < o[1] or (x[1] == o[1] and x[2] < o[2]) then missing = true end
  end
  for p, x in pairs(new) do
    local o = old[p]
    if not o or x[1] > o[1] or (x[1] == o[1] and x[2] > o[2]) then newer = true end
  end
  if not newer then return 0 end
  if missing then return 2 end
  return 1
end
local ttl, spans = tonumber(ARGV[1]), false
for i = 1, n do
  local key, v, old = KEYS[i], ARGV[i + 3], stored[KEYS[i]]
  local new = fences(v, string.sub(v, memories_end(v) + 1))
  local code = 1
  if old then code = compare(new, old) end
  if code == 1 then
    write(key, v, ttl)
    stored[key] = new
    local partitions, added = 0, false
    for p in pairs(new) do
      if p ~= %(resets)d then
        partitions = partitions + 1
        if old and not old[p] then added = true end
      end
    end
    if added or (not old and partitions > 1) then spans = true end
  end
  codes[i] = code
end
for j = n + 1, n + m do
  local new, old = ARGV[j + 3], redis.call('GET', KEYS[j])
  if not old or #new > #old or (#new == #old and new > old) then redis.call('SET', KEYS[j], new) end
end
if spans and KEYS[n + m + 1] then redis.call('INCR', KEYS[n + m + 1]) end
return codes
