-- A daemon that cannot reach Redis sends at its share of each limit (the limit divided by the
-- live daemons, sendd.shared.limits) and says so here; the daemons that still reach Redis read
-- how many do and leave them their shares, so that the fleet stays within every limit when
-- Redis is away for only some of them.
--
-- Only a column added, with a default: a daemon of the previous release does not read it.

ALTER TABLE sendd.instance
    ADD COLUMN limits_local boolean NOT NULL DEFAULT false;
