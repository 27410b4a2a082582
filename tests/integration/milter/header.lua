-- A shadow rule that would have fired leaves the verdict alone and records
-- itself in a header: `header` added with a value containing `expect`.
dofile(dir .. "/common.lua")
local conn = open()
for i = 1, 2 do
  envelope(conn, "<sender@good.example>", {rcpt})
  local r = content(conn, "msg " .. i, "body\r\n")
  if r ~= SMFIR_ACCEPT and r ~= SMFIR_CONTINUE then error("message " .. i .. " not accepted") end
end
if not mt.eom_check(conn, MT_HDRADD, header) then error("no " .. header .. " header added") end
local value = mt.getheader(conn, header, 0)
if value == nil or string.find(value, expect, 1, true) == nil then
  error(header .. " is " .. tostring(value) .. ", expected it to contain " .. expect)
end
mt.disconnect(conn)
mt.echo("header: " .. value)
