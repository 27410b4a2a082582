-- Per-recipient rate limit: after `limit` messages to `rcpt`, that RCPT gets
-- 451 (setreply + tempfail) while another recipient of the same message goes on.
dofile(dir .. "/common.lua")
local conn = open()
for i = 1, tonumber(limit) do
  local replies = envelope(conn, "<flood@spam.example>", {rcpt})
  if replies[1] ~= SMFIR_CONTINUE then fail("message " .. i .. " refused too early") end
  local r = content(conn, "wave " .. i, "same body\r\n")
  if r ~= SMFIR_ACCEPT and r ~= SMFIR_CONTINUE then fail("message " .. i .. " not accepted") end
end
local replies = envelope(conn, "<flood@spam.example>", {rcpt, "<other@test.example>"})
if replies[1] ~= SMFIR_REPLYCODE then fail("over-limit recipient not tempfailed: " .. tostring(replies[1])) end
if replies[2] ~= SMFIR_CONTINUE then fail("other recipient refused: " .. tostring(replies[2])) end
local r = content(conn, "wave last", "same body\r\n")
if r ~= SMFIR_ACCEPT and r ~= SMFIR_CONTINUE then fail("message to the other recipient not accepted") end
mt.disconnect(conn)
mt.echo("rcpt_tempfail: ok")
