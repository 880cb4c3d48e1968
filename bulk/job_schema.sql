-- The embedded job store's tables, for bulk/job_store.py (user_version 1).
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order: oldest job first
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL
        CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL NOT NULL,
    options TEXT NOT NULL,
    callback_url TEXT,
    callback_state TEXT CHECK (callback_state IN ('pending', 'delivered', 'failed')),
    callback_error TEXT,
    error TEXT,
    total INTEGER NOT NULL,
    spool_dir TEXT,
    spool_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS items (
    job_seq INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    source TEXT NOT NULL,
    input_ref TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('pending', 'claimed', 'done', 'error', 'skipped')),
    result TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT,
    claimed_at REAL,
    finished_at REAL,
    PRIMARY KEY (job_seq, idx)
);
CREATE INDEX IF NOT EXISTS items_pending ON items (job_seq, idx) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS items_claimed ON items (claimed_at) WHERE state = 'claimed';
CREATE INDEX IF NOT EXISTS items_by_state ON items (job_seq, state);
