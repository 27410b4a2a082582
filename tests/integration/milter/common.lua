-- Shared steps for the queueguard milter scripts (loaded with dofile).
-- Globals from miltertest -D: sock (libmilter spec), plus per-script ones.

-- miltertest swallows Lua error messages: print them first.
function fail(msg)
  mt.echo("FAIL: " .. msg)
  error(msg)
end

function check(err, what)
  if err ~= nil then fail(what .. ": " .. tostring(err)) end
end

function want_reply(conn, want, what)
  local got = mt.getreply(conn)
  if got ~= want then
    fail(what .. ": expected reply " .. tostring(want) .. ", got " .. tostring(got))
  end
end

-- A connection that has said HELO, from ip (default 192.0.2.1).
function open(ip)
  local conn = mt.connect(sock, 40, 0.25)
  if conn == nil then fail("cannot connect to milter at " .. sock) end
  check(mt.conninfo(conn, "client.example", ip or "192.0.2.1"), "conninfo")
  want_reply(conn, SMFIR_CONTINUE, "connect")
  if not mt.test_option(conn, SMFIP_NOHELO) then
    check(mt.helo(conn, "client.example"), "helo")
  end
  return conn
end

-- Envelope: MAIL FROM, then each recipient; returns the list of replies.
function envelope(conn, sender, rcpts)
  check(mt.mailfrom(conn, sender), "mailfrom")
  want_reply(conn, SMFIR_CONTINUE, "mail from " .. sender)
  local replies = {}
  for i, r in ipairs(rcpts) do
    check(mt.rcptto(conn, r), "rcptto")
    replies[i] = mt.getreply(conn)
  end
  return replies
end

-- Headers and body, then end of message; returns the eom reply.
function content(conn, subject, body)
  check(mt.header(conn, "From", "Sender <sender@good.example>"), "header")
  check(mt.header(conn, "Subject", subject), "header")
  if not mt.test_option(conn, SMFIP_NOEOH) then check(mt.eoh(conn), "eoh") end
  check(mt.bodystring(conn, body), "body")
  check(mt.eom(conn), "eom")
  return mt.getreply(conn)
end
