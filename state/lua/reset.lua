-- KEYS[1]: a memory key; KEYS[2] (one server only): the outside-writes counter. ARGV[1]: TTL in
-- ms (0: none). ARGV[2]: updated_at, 8 bytes. Zeroes the step and the states, keeps the
-- fences and counts the reset among them (under partition RESETS, the first of the more
-- fences), so that no commit made from the memory before the reset can overwrite it; counts
-- itself as an outside write, so that workers drop what they cached. Only a real reset counts
-- (an unknown id, sent by anyone with the API, would make every worker drop its cache).
-- Returns 1 when reset, 0 when nothing is stored, -1 when the stored value is foreign.
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if not ours(v) then return -1 end
if KEYS[2] then redis.call('INCR', KEYS[2]) end
local size = memories_end(v)
local resets, others = 0, {}
for i = size + 1, #v, 12 do
  if i32(v, i) == %(resets)d then resets = u32(v, i + 4)
  else others[#others + 1] = string.sub(v, i, i + 11) end
end
local count, bytes = resets + 1, {}
for k = 1, 4 do bytes[k] = count %% 256; count = math.floor(count / 256) end
local more = two_states(v) and V2 or V4
write(KEYS[1], string.sub(v, 1, 4) .. string.char(more) .. string.sub(v, 6, %(step)d)
  .. string.rep('\0', 8) .. ARGV[2] .. string.sub(v, HEADER + 1, head_size(v))
  .. string.rep('\0', size - head_size(v))
  .. '%(resets_bytes)s' .. string.char(unpack(bytes)) .. string.rep('\0', 4)
  .. table.concat(others), tonumber(ARGV[1]))
return 1
