-- Lua 5.1 numbers are doubles: read integers byte by byte, and compare an i64 offset as its
-- signed high word then its unsigned low word, which is exact for every offset.
local HEADER, MAGIC, V1, V2 = %(header)d, '%(magic)s', %(v1)d, %(v2)d
local function u32(s, i)
  local a, b, c, d = string.byte(s, i, i + 3)
  return a + 256 * (b + 256 * (c + 256 * d))
end
local function i32(s, i)
  local n = u32(s, i)
  if n >= 2147483648 then n = n - 4294967296 end
  return n
end
local function ours(v)
  if #v < HEADER or string.sub(v, 1, 4) ~= MAGIC then return false end
  local version = string.byte(v, 5)
  return version == V1 or version == V2
end
local function memory_size(head)  -- LTM and STM, from the header: what lies before more fences
  local item = string.byte(head, 6) == %(float32)d and 4 or 2
  return 2 * (string.byte(head, 7) + 256 * string.byte(head, 8)) * u32(head, 9) * item
end
local function fences(head, tail)  -- partition -> {high word, low word} of its offset
  local f = {[i32(head, %(partition)d)] = {i32(head, %(offset)d + 4), u32(head, %(offset)d)}}
  for i = 1, #tail, 12 do f[i32(tail, i)] = {i32(tail, i + 8), u32(tail, i + 4)} end
  return f
end
local function write(key, v, ttl)
  if ttl > 0 then redis.call('SET', key, v, 'PX', ttl) else redis.call('SET', key, v) end
end
