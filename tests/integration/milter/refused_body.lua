-- A message whose body (from file `body`) queueguard refuses at end of
-- message: EICAR with clamd configured, or one over the size limit.
-- miltertest cannot show the text of an end-of-message reply (MT_SMTPREPLY
-- does not see it), so the test reads the code from queueguard's log line.
dofile(dir .. "/common.lua")
local conn = open()
envelope(conn, "<sender@good.example>", {"<bob@test.example>"})
check(mt.header(conn, "Subject", "test file"), "header")
if not mt.test_option(conn, SMFIP_NOEOH) then check(mt.eoh(conn), "eoh") end
check(mt.bodyfile(conn, body), "bodyfile")
check(mt.eom(conn), "eom")
if mt.getreply(conn) ~= SMFIR_REPLYCODE then fail("message not refused: " .. tostring(mt.getreply(conn))) end
mt.disconnect(conn)
mt.echo("refused")
