-- The accounts each running daemon serves, so that any daemon can tell messages that no daemon
-- of the fleet will ever send (an account named nowhere in a configuration) from messages that
-- are merely waiting for another daemon.
ALTER TABLE sendd.instance ADD COLUMN accounts text[] NOT NULL DEFAULT '{}';
