-- Honest inserts: applications insert into sendd.message and sendd.campaign directly, so the
-- database itself holds every new row to what sendd needs of it.
--   * A new message is `queued`, unclaimed (lease_owner NULL) and unattempted (attempts 0);
--     its tenant is its campaign's; its campaign still takes messages (not completed or
--     cancelled). Otherwise the insert is refused, with a message naming the column.
--   * Its segments are never fewer than its body needs (sendd.segments_needed, the rule of
--     sendd/segments.py): a missing or lower count is raised, on insert and on update.
--   * A malformed recipient (not an optional + and 7 to 15 digits, the first not 0) fails the
--     message at once (`INVALID_NUMBER`), counted like any failure, never sent.
--   * A campaign is created `draft` by default: the application inserts its messages, then
--     starts it (`sending`, or `scheduled`); nothing completes it while it loads.
-- The checks on messages run once per statement over its transition table, not per row, so a
-- COPY of a million rows pays a few scans of what it inserted.

-- Every message write waits until this commits: existing rows are put right below, and no row
-- may slip in under the old rules meanwhile.
LOCK TABLE sendd.message IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE sendd.campaign ALTER COLUMN status SET DEFAULT 'draft';

-- --- The rules ----------------------------------------------------------------------------

-- Pack 1- and 2-unit characters greedily into parts of `part` units; a pair never straddles two
-- parts (sendd.segments._count). `pair` is a regular expression class of the 2-unit characters.
-- Only for bodies over one segment that have such characters (GSM-7 extension, UTF-16 surrogate
-- pairs): the loop runs once per part.
CREATE FUNCTION sendd.pack_segments(body text, pair text, part integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    units text := regexp_replace(body, '(' || pair || ')', E'\\1\x1b', 'g');  -- one char a unit
    total integer := length(units);
    used integer := 0;
    parts integer := 1;
BEGIN
    WHILE total - used > part LOOP
        -- The part's last unit begins a pair: the pair goes whole to the next part.
        used := used + part - (substr(units, used + part, 1) ~ pair)::integer;
        parts := parts + 1;
    END LOOP;
    RETURN parts;
END $$;

-- SMS segments of a body, exactly as sendd.segments.count_segments counts them (a property test
-- holds the two together): GSM-7 when every character is in the GSM 03.38 alphabet, 160 septets
-- in one part, else 153 a part, extension characters 2 septets; otherwise UCS-2, 70 UTF-16 units
-- in one part, else 67, characters beyond the BMP 2 units. Regular expressions rather than
-- a loop: about 2 us a body (a loop over characters costs a hundred times that).
CREATE FUNCTION sendd.segments_needed(body text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        -- 70 bytes are at most 140 septets or 70 UTF-16 units: one part whatever the text.
        WHEN octet_length(body) <= 70 THEN 1
        WHEN body ~ '^[\n\r\u0020-\u003f@A-Z_a-z¡£¤¥§¿ÄÅÆÇÉÑÖØÜßàäåæèéìñòöøùüΓΔΘΛΞΠΣΦΨΩ]*$' THEN
            CASE WHEN length(body) <= 160 THEN 1 ELSE (length(body) + 152) / 153 END
        WHEN body ~ ('^[\n\r\u0020-\u003f@A-Z_a-z¡£¤¥§¿ÄÅÆÇÉÑÖØÜßàäåæèéìñòöøùüΓΔΘΛΞΠΣΦΨΩ'
                     '\f\[\\\]\^{|}~€]*$') THEN
            CASE WHEN 2 * length(body)
                      - length(regexp_replace(body, '[\f\[\\\]\^{|}~€]', '', 'g')) <= 160
                 THEN 1
                 ELSE sendd.pack_segments(body, '[\f\[\\\]\^{|}~€]', 153) END
        WHEN body !~ '[\U00010000-\U0010ffff]' THEN
            CASE WHEN length(body) <= 70 THEN 1 ELSE (length(body) + 66) / 67 END
        WHEN 2 * length(body)
             - length(regexp_replace(body, '[\U00010000-\U0010ffff]', '', 'g')) <= 70 THEN 1
        ELSE sendd.pack_segments(body, '[\U00010000-\U0010ffff]', 67)
    END
$$;

-- E.164 shape: an optional +, then 7 to 15 digits, the first not 0 (country codes never start
-- with 0). `sendd enqueue` also checks numbers with phonenumbers and queues only this shape.
CREATE FUNCTION sendd.recipient_valid(recipient text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT length(ltrim(recipient, '+')) BETWEEN 7 AND 15 AND recipient ~ '^\+?[1-9][0-9]*$'
$$;

-- --- Messages -----------------------------------------------------------------------------

-- The one place where a message row is corrected: segments raised to what the body needs; a
-- queued message to a malformed recipient failed (the counters trigger counts it). Fires only
-- for statements that set body, segments or recipient, which no daemon statement does.
CREATE FUNCTION sendd.message_rewritten() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.segments := greatest(NEW.segments, sendd.segments_needed(NEW.body));
    IF NEW.status = 'queued' AND NOT sendd.recipient_valid(NEW.recipient) THEN
        NEW.status := 'failed';
        NEW.error_code := 'INVALID_NUMBER';
        NEW.error_text := 'recipient is not an E.164 number: an optional +, then 7 to 15 '
                          'digits, the first not 0';
        NEW.finished_at := now();
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER message_rewritten BEFORE UPDATE OF body, segments, recipient ON sendd.message
    FOR EACH ROW EXECUTE FUNCTION sendd.message_rewritten();

-- Every insert statement (INSERT or COPY): refuse rows that are not new messages or that do not
-- fit their campaign, count the rest into their campaigns, correct the misfits. Rows inserted in
-- flight are refused now, so the in-flight segments of 0005 no longer change here.
CREATE OR REPLACE FUNCTION sendd.message_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    campaign_ids bigint[];
    tenant_ids text[];
    counts bigint[];
    refused boolean;
    misfits bigint[];
    bad record;
BEGIN
    SELECT array_agg(g.campaign_id), array_agg(g.tenant_id), array_agg(g.count),
           bool_or(g.refused)
    INTO campaign_ids, tenant_ids, counts, refused
    FROM (SELECT campaign_id, tenant_id, count(*) AS count,
                 bool_or(status <> 'queued' OR lease_owner IS NOT NULL OR attempts <> 0)
                     AS refused
          FROM new_rows GROUP BY campaign_id, tenant_id) g;
    IF refused THEN
        SELECT id, status, lease_owner, attempts INTO bad FROM new_rows
        WHERE status <> 'queued' OR lease_owner IS NOT NULL OR attempts <> 0
        ORDER BY id LIMIT 1;
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = CASE
            WHEN bad.status <> 'queued' THEN format(
                'sendd.message.status of a new message must be ''queued'', not %L (message %s):'
                ' only sendd moves a message on', bad.status, bad.id)
            WHEN bad.lease_owner IS NOT NULL THEN format(
                'sendd.message.lease_owner of a new message must be NULL, not %L (message %s):'
                ' only a daemon''s claim sets it', bad.lease_owner, bad.id)
            ELSE format('sendd.message.attempts of a new message must be 0, not %s (message %s)',
                        bad.attempts, bad.id) END;
    END IF;

    -- Campaigns in id order, as the counters trigger locks them (no deadlock between the two);
    -- once locked, a campaign cannot complete or be cancelled while these rows join it.
    PERFORM 1 FROM sendd.campaign WHERE id = ANY (campaign_ids) ORDER BY id FOR NO KEY UPDATE;
    SELECT c.id, c.status, c.tenant_id AS owner, g.tenant INTO bad
    FROM unnest(campaign_ids, tenant_ids) AS g(campaign, tenant)
    JOIN sendd.campaign c ON c.id = g.campaign
    WHERE c.tenant_id <> g.tenant OR c.status IN ('completed', 'cancelled')
    ORDER BY c.id LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = CASE
            WHEN bad.owner <> bad.tenant THEN format(
                'sendd.message.tenant_id must be its campaign''s tenant: campaign %s belongs to'
                ' %L, not %L', bad.id, bad.owner, bad.tenant)
            ELSE format('sendd.message.campaign_id: campaign %s is %s and takes no more messages'
                        ' (create a new campaign)', bad.id, bad.status) END;
    END IF;
    UPDATE sendd.campaign c SET total = c.total + a.count
    FROM (SELECT campaign, sum(count) AS count
          FROM unnest(campaign_ids, counts) AS u(campaign, count)
          WHERE campaign IS NOT NULL GROUP BY campaign) a
    WHERE c.id = a.campaign;

    SELECT array_agg(id) INTO misfits FROM new_rows
    WHERE segments < sendd.segments_needed(body) OR NOT sendd.recipient_valid(recipient);
    IF misfits IS NOT NULL THEN
        -- Rewriting their segments runs them through message_rewritten, where the rule lives.
        UPDATE sendd.message SET segments = segments WHERE id = ANY (misfits);
    END IF;
    PERFORM pg_notify('sendd_queued', '');
    RETURN NULL;
END $$;

-- --- Campaigns ----------------------------------------------------------------------------

-- The counters are sendd's to keep: a new campaign starts from zero.
CREATE FUNCTION sendd.campaign_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    counter record;
BEGIN
    SELECT c.name, c.value INTO counter
    FROM (VALUES ('total', NEW.total), ('sent', NEW.sent), ('failed', NEW.failed),
                 ('delivered', NEW.delivered), ('undelivered', NEW.undelivered),
                 ('unknown', NEW.unknown), ('cancelled', NEW.cancelled)) AS c(name, value)
    WHERE c.value <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format(
            'sendd.campaign.%s of a new campaign must be 0, not %s: sendd keeps the counters',
            counter.name, counter.value);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER campaign_inserted BEFORE INSERT ON sendd.campaign
    FOR EACH ROW EXECUTE FUNCTION sendd.campaign_inserted();

-- A campaign started (by `sendd campaign start`, an application's UPDATE or its schedule) whose
-- every message already reached an outcome (e.g. all malformed numbers) is completed at once:
-- no status change of a message is left to complete it. An empty one stays `sending`.
CREATE FUNCTION sendd.campaign_started_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.status := 'completed';
    NEW.finished_at := now();
    NEW.pause_reason := NULL;
    RETURN NEW;
END $$;

CREATE TRIGGER campaign_started_finished BEFORE UPDATE OF status ON sendd.campaign
    FOR EACH ROW
    WHEN (NEW.status = 'sending' AND OLD.status <> 'sending' AND NEW.total > 0
          AND NEW.sent + NEW.failed + NEW.unknown + NEW.cancelled >= NEW.total)
    EXECUTE FUNCTION sendd.campaign_started_finished();

-- --- Existing rows: what the old rules let in, made what the new rules would have made ---------
-- Ordinary updates, so the counters trigger counts each change; nothing is sent or billed.

-- Claimed by no daemon (no owner, or an owner that is no instance) and never submitted: these
-- were inserted `sending` and would have stayed so for ever. Back to the queue.
UPDATE sendd.message m SET
    status = CASE WHEN EXISTS (SELECT 1 FROM sendd.campaign c
                               WHERE c.id = m.campaign_id AND c.status = 'cancelled')
                  THEN 'cancelled' ELSE 'queued' END,
    lease_owner = NULL
WHERE m.status = 'sending'
  AND NOT EXISTS (SELECT 1 FROM sendd.instance i WHERE i.id = m.lease_owner)
  AND NOT EXISTS (SELECT 1 FROM sendd.submission s WHERE m.id = ANY (s.message_ids));

-- Another tenant's message in a campaign is never claimed (the claim pays with the campaign's
-- tenant's credits): fail it, with a reason.
UPDATE sendd.message m SET status = 'failed', error_code = 'TENANT_MISMATCH',
    error_text = 'its tenant_id is not its campaign''s tenant (found by migration 0008)',
    finished_at = now()
FROM sendd.campaign c
WHERE c.id = m.campaign_id AND m.tenant_id <> c.tenant_id AND m.status = 'queued';

UPDATE sendd.message SET segments = segments
WHERE status = 'queued'
  AND (segments < sendd.segments_needed(body) OR NOT sendd.recipient_valid(recipient));

UPDATE sendd.message m SET status = 'cancelled', finished_at = now()
FROM sendd.campaign c
WHERE c.id = m.campaign_id AND c.status = 'cancelled' AND m.status = 'queued';

-- Counters as the rows say (rows inserted in a final status were never counted as such).
UPDATE sendd.campaign c SET total = r.total, sent = r.sent, failed = r.failed,
    delivered = r.delivered, undelivered = r.undelivered, unknown = r.unknown,
    cancelled = r.cancelled
FROM (SELECT k.id, count(m.id) AS total,
             count(*) FILTER (WHERE m.status IN ('sent', 'delivered', 'undelivered')) AS sent,
             count(*) FILTER (WHERE m.status = 'failed') AS failed,
             count(*) FILTER (WHERE m.status = 'delivered') AS delivered,
             count(*) FILTER (WHERE m.status = 'undelivered') AS undelivered,
             count(*) FILTER (WHERE m.status = 'unknown') AS unknown,
             count(*) FILTER (WHERE m.status = 'cancelled') AS cancelled
      FROM sendd.campaign k LEFT JOIN sendd.message m ON m.campaign_id = k.id
      GROUP BY k.id) r
WHERE c.id = r.id
  AND (c.total, c.sent, c.failed, c.delivered, c.undelivered, c.unknown, c.cancelled)
      IS DISTINCT FROM
      (r.total, r.sent, r.failed, r.delivered, r.undelivered, r.unknown, r.cancelled);

-- A completed campaign that messages joined later is reopened, paused: an operator decides
-- (resume sends them, cancel cancels them); nothing old is sent unasked.
UPDATE sendd.campaign SET status = 'paused', finished_at = NULL,
    pause_reason = 'reopened by migration 0008: messages were added after it completed; '
                   'resume or cancel it'
WHERE status = 'completed' AND sent + failed + unknown + cancelled < total;

UPDATE sendd.campaign SET status = 'completed', finished_at = now(), pause_reason = NULL
WHERE status IN ('sending', 'paused') AND total > 0
  AND sent + failed + unknown + cancelled >= total;
