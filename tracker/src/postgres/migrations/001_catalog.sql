-- Versions, tags with every move, and rollout records: what the file stores keep under
-- --data-dir, for replicas to share.

CREATE TABLE versions (
    name         text   NOT NULL,
    sha256       text   NOT NULL,
    -- The metainfo exactly as published.
    metainfo     bytea  NOT NULL,
    published_at bigint NOT NULL,
    PRIMARY KEY (name, sha256)
);

-- A published version never changes, whoever asks.
CREATE FUNCTION fbpkg_versions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'published versions never change (%:%)', OLD.name, OLD.sha256;
END
$$;
CREATE TRIGGER versions_immutable BEFORE UPDATE OR DELETE ON versions
    FOR EACH ROW EXECUTE FUNCTION fbpkg_versions_immutable();

-- Where each tag points now.
CREATE TABLE tags (
    name   text NOT NULL,
    tag    text NOT NULL,
    sha256 text NOT NULL,
    PRIMARY KEY (name, tag),
    FOREIGN KEY (name, sha256) REFERENCES versions
);

-- Every move of every tag, in order: the history rows.
CREATE TABLE tag_moves (
    id     bigserial PRIMARY KEY,
    name   text   NOT NULL,
    tag    text   NOT NULL,
    sha256 text   NOT NULL,
    at     bigint NOT NULL,
    FOREIGN KEY (name, tag) REFERENCES tags,
    FOREIGN KEY (name, sha256) REFERENCES versions
);
CREATE INDEX tag_moves_by_tag ON tag_moves (name, tag, id);

-- One record per tag: the active rollout and the bounded history (as the file store keeps).
CREATE TABLE rollouts (
    name   text  NOT NULL,
    tag    text  NOT NULL,
    record jsonb NOT NULL,
    PRIMARY KEY (name, tag)
);

-- Every saved record, in order: each transition of each rollout, kept.
CREATE TABLE rollout_changes (
    id       bigserial   PRIMARY KEY,
    name     text        NOT NULL,
    tag      text        NOT NULL,
    saved_at timestamptz NOT NULL DEFAULT now(),
    record   jsonb       NOT NULL
);
CREATE INDEX rollout_changes_by_tag ON rollout_changes (name, tag, id);
