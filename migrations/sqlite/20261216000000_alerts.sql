-- Alerts (issue 27): a webhook event when a key's budget or a user's balance crosses a
-- configured fraction spent. Each crossing is claimed here before it is sent, by
-- `INSERT ... ON CONFLICT DO NOTHING RETURNING id`: only the instance whose insert made the
-- row sends it, so a crossing is sent once however many instances see it.
-- `kind` is `key_budget` (subject: the key) or `balance` (subject: the user); `cycle` is
-- what re-arms it: a key's budget period start (0 for a total budget), or the ledger id of
-- the user's latest credit (registration or a positive grant); `of_tokens` is what the
-- fraction was of (the budget, or the balance that credit left), so changing a key's
-- budget re-arms it too. `threshold_ppm`: the fraction in millionths.

CREATE TABLE alerts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT    NOT NULL,
    subject_id    INTEGER NOT NULL,
    threshold_ppm INTEGER NOT NULL,
    cycle         INTEGER NOT NULL,
    of_tokens     INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    UNIQUE (kind, subject_id, threshold_ppm, cycle, of_tokens)
);

-- A user's latest credit without walking every chat of theirs since: only credits are in
-- it, so it stays small (one row a registration or grant).
CREATE INDEX ledger_credits ON ledger (user_id, id)
WHERE reason IN ('initial_grant', 'grant') AND amount > 0;
