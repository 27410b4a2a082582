-- A message carrying the EICAR test string (from file `body`) is rejected
-- 550 5.7.1 at end of message when clamd is configured.
dofile(dir .. "/common.lua")
local conn = open()
envelope(conn, "<sender@good.example>", {"<bob@test.example>"})
check(mt.header(conn, "Subject", "test file"), "header")
if not mt.test_option(conn, SMFIP_NOEOH) then check(mt.eoh(conn), "eoh") end
check(mt.bodyfile(conn, body), "bodyfile")
check(mt.eom(conn), "eom")
if mt.getreply(conn) ~= SMFIR_REPLYCODE then error("infected message not refused: " .. string.char(mt.getreply(conn))) end
if not mt.eom_check(conn, MT_SMTPREPLY, "550", "5.7.1") then error("refusal is not 550 5.7.1") end
mt.disconnect(conn)
mt.echo("eicar: rejected")
