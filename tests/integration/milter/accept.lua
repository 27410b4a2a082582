-- An ordinary message is accepted; negotiation asks only for what the milter uses.
dofile(dir .. "/common.lua")
local conn = open()
-- Steps it does not use are skipped; header, body, connect, helo and mail need no reply.
if not mt.test_option(conn, SMFIP_NOEOH) then fail("eoh step not skipped") end
if not mt.test_option(conn, SMFIP_NODATA) then fail("data step not skipped") end
if not mt.test_option(conn, SMFIP_NOUNKNOWN) then fail("unknown step not skipped") end
if not mt.test_option(conn, SMFIP_NR_HDR) then fail("header replies not skipped") end
if not mt.test_option(conn, SMFIP_NR_BODY) then fail("body replies not skipped") end
-- Only RCPT and end of message are answered (docs/benchmarks.md#milter: round trips).
if not mt.test_option(conn, SMFIP_NR_CONN) then fail("connect reply not skipped") end
if not mt.test_option(conn, SMFIP_NR_HELO) then fail("helo reply not skipped") end
if not mt.test_option(conn, SMFIP_NR_MAIL) then fail("mail reply not skipped") end
if mt.test_option(conn, SMFIP_NR_RCPT) then fail("rcpt must be answered (per-recipient limits)") end
if not mt.test_action(conn, SMFIF_ADDHDRS) then fail("add-header action not negotiated") end
if mt.test_action(conn, SMFIF_CHGBODY) then fail("change-body action negotiated but never used") end
if mt.test_action(conn, SMFIF_ADDRCPT) then fail("add-recipient action negotiated but never used") end
if mt.test_action(conn, SMFIF_QUARANTINE) ~= (hold == "1") then fail("quarantine action does not match mode") end
local replies = envelope(conn, "<alice@good.example>", {"<bob@test.example>", "<carol@test.example>"})
for i, r in ipairs(replies) do
  if r ~= SMFIR_CONTINUE then fail("recipient " .. i .. " not accepted: " .. tostring(r)) end
end
local r = content(conn, "hello", "line one\r\nline two\r\n")
if r ~= SMFIR_ACCEPT and r ~= SMFIR_CONTINUE then fail("message not accepted: " .. tostring(r)) end
if mt.eom_check(conn, MT_QUARANTINE) then fail("ordinary message quarantined") end
if mt.eom_check(conn, MT_HDRADD) then fail("header added without any rule hit") end
mt.disconnect(conn)
mt.echo("accept: ok")
