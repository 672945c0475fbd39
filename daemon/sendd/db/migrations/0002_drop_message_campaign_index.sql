-- Every status change rewrote an entry of this index (the status updates cannot be HOT), two per
-- message sent, and nothing needs it: the poller and `campaign cancel` find a campaign's queued
-- messages through message_campaign_queue, and campaign counts come from the campaign row.
DROP INDEX sendd.message_campaign;
