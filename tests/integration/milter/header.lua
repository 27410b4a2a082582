-- A shadow rule that would have fired leaves the verdict alone and records
-- itself in a header: `header` added with the value `expected`.
-- (miltertest's Lua has no string library: compare whole values.)
dofile(dir .. "/common.lua")
local conn = open()
for i = 1, 2 do
  envelope(conn, "<sender@good.example>", {rcpt})
  local r = content(conn, "msg " .. i, "body\r\n")
  if r ~= SMFIR_ACCEPT and r ~= SMFIR_CONTINUE then fail("message " .. i .. " not accepted") end
end
if not mt.eom_check(conn, MT_HDRADD, header) then fail("no " .. header .. " header added") end
local value = mt.getheader(conn, header, 0)
if value ~= expected then
  fail(header .. " is " .. tostring(value) .. ", expected " .. expected)
end
mt.disconnect(conn)
mt.echo("header: " .. value)
