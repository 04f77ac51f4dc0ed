-- Lua 5.1 numbers are doubles: read integers byte by byte, and compare an i64 offset as its
-- signed high word then its unsigned low word, which is exact for every offset.
local HEADER, STATES_HEADER, MAGIC = %(header)d, %(states_header)d, '%(magic)s'
local V1, V2, V3, V4 = %(v1)d, %(v2)d, %(v3)d, %(v4)d
local function u32(s, i)
  local a, b, c, d = string.byte(s, i, i + 3)
  return a + 256 * (b + 256 * (c + 256 * d))
end
local function i32(s, i)
  local n = u32(s, i)
  if n >= 2147483648 then n = n - 4294967296 end
  return n
end
local function two_states(v)  -- formats 1 and 2: an LSTM's two states, the 40-byte header
  local version = string.byte(v, 5)
  return version == V1 or version == V2
end
local function ours(v)  -- v: the value, or its first STATES_HEADER bytes
  if #v < HEADER or string.sub(v, 1, 4) ~= MAGIC then return false end
  local version = string.byte(v, 5)
  if two_states(v) then return true end
  return (version == V3 or version == V4) and #v >= STATES_HEADER and string.byte(v, HEADER + 1) > 0
end
local function more_fences(v)  -- formats 2 and 4
  local version = string.byte(v, 5)
  return version == V2 or version == V4
end
local function head_size(v)  -- where the states start
  if two_states(v) then return HEADER end
  return STATES_HEADER
end
local function memories_end(v)  -- header and states, from the header: what lies before more fences
  local item = string.byte(v, 6) == %(float32)d and 4 or 2
  local states = two_states(v) and 2 or string.byte(v, HEADER + 1)
  return head_size(v) + states * (string.byte(v, 7) + 256 * string.byte(v, 8)) * u32(v, 9) * item
end
local function fences(head, tail)  -- partition -> {high word, low word} of its offset
  local f = {[i32(head, %(partition)d)] = {i32(head, %(offset)d + 4), u32(head, %(offset)d)}}
  for i = 1, #tail, 12 do f[i32(tail, i)] = {i32(tail, i + 8), u32(tail, i + 4)} end
  return f
end
local function write(key, v, ttl)
  if ttl > 0 then redis.call('SET', key, v, 'PX', ttl) else redis.call('SET', key, v) end
end
