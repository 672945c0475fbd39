-- Tenants' weights for fair sharing (`sendd tenant set T --weight N`): where tenants compete,
-- each claim splits its messages between them, and the senders take their turns, in proportion
-- to their weights. 1 (the default) to 1000. Every daemon's housekeeper reads it once a second
-- with the rate limits (sendd.actors.housekeeper).
--
-- Only a column added, with a default: a daemon of the previous release does not read it, and
-- `sendd tenant set` of that release still works (the column keeps its default or its value).

ALTER TABLE sendd.tenant
    ADD COLUMN weight integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000);
