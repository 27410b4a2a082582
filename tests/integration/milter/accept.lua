-- An ordinary message is accepted; negotiation asks only for what the milter uses.
dofile(dir .. "/common.lua")
local conn = open()
-- Steps it does not use are skipped; header and body need no reply.
if not mt.test_option(conn, SMFIP_NOEOH) then error("eoh step not skipped") end
if not mt.test_option(conn, SMFIP_NODATA) then error("data step not skipped") end
if not mt.test_option(conn, SMFIP_NOUNKNOWN) then error("unknown step not skipped") end
if not mt.test_option(conn, SMFIP_NR_HDR) then error("header replies not skipped") end
if not mt.test_option(conn, SMFIP_NR_BODY) then error("body replies not skipped") end
if not mt.test_action(conn, SMFIF_ADDHDRS) then error("add-header action not negotiated") end
if mt.test_action(conn, SMFIF_CHGBODY) then error("change-body action negotiated but never used") end
if mt.test_action(conn, SMFIF_ADDRCPT) then error("add-recipient action negotiated but never used") end
if mt.test_action(conn, SMFIF_QUARANTINE) ~= (hold == "1") then error("quarantine action does not match mode") end
local replies = envelope(conn, "<alice@good.example>", {"<bob@test.example>", "<carol@test.example>"})
for i, r in ipairs(replies) do
  if r ~= SMFIR_CONTINUE then error("recipient " .. i .. " not accepted: " .. string.char(r)) end
end
local r = content(conn, "hello", "line one\r\nline two\r\n")
if r ~= SMFIR_ACCEPT and r ~= SMFIR_CONTINUE then error("message not accepted: " .. string.char(r)) end
if mt.eom_check(conn, MT_QUARANTINE) then error("ordinary message quarantined") end
if mt.eom_check(conn, MT_HDRADD) then error("header added without any rule hit") end
mt.disconnect(conn)
mt.echo("accept: ok")
