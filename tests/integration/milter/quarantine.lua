-- A message a quarantine rule catches (the second one to `rcpt` under a 1/1h
-- rule with action quarantine). mode=store: kept in queueguard's store, the MTA
-- is told to discard it. mode=hold: the MTA is told to put it on hold (accept).
dofile(dir .. "/common.lua")
local conn = open()
envelope(conn, "<sender@good.example>", {rcpt})
local r = content(conn, "first", "first body\r\n")
if r ~= SMFIR_ACCEPT and r ~= SMFIR_CONTINUE then fail("first message not accepted") end
if mt.eom_check(conn, MT_QUARANTINE) then fail("first message quarantined") end
envelope(conn, "<sender@good.example>", {rcpt})
r = content(conn, "second " .. marker, "second body\r\n")
if mode == "store" then
  if r ~= SMFIR_DISCARD then fail("stored message not discarded at the MTA: " .. tostring(r)) end
  if mt.eom_check(conn, MT_QUARANTINE) then fail("stored message also sent to the hold queue") end
else
  if r ~= SMFIR_ACCEPT then fail("held message not accepted: " .. tostring(r)) end
  if not mt.eom_check(conn, MT_QUARANTINE) then fail("MTA not asked to hold the message") end
  if not mt.eom_check(conn, MT_HDRADD, header) then fail("held message lacks " .. header) end
end
mt.disconnect(conn)
mt.echo("quarantine " .. mode .. ": ok")
