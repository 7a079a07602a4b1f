-- What hosts said about active rollouts, shared by replicas so that the replica running the
-- rollout controller judges every host, whichever replica it talks to. Soft state: unlogged
-- (a database crash empties them; hosts report again at their next follow interval).

CREATE UNLOGGED TABLE rollout_hosts (
    name       text   NOT NULL,
    tag        text   NOT NULL,
    host       text   NOT NULL,
    rollout_id bigint NOT NULL,
    -- zone, state, detail, health_seen, by_get (the tracker's HostVote without its clock).
    vote       jsonb  NOT NULL,
    -- When the host last resolved or reported, Unix ms (the replicas' shared clock).
    seen_ms    bigint NOT NULL,
    PRIMARY KEY (name, tag, host)
);
CREATE INDEX rollout_hosts_by_time ON rollout_hosts (seen_ms);

-- The address each host id last resolved from: a report counts only from there.
CREATE UNLOGGED TABLE host_addrs (
    host    text   PRIMARY KEY,
    ip      text   NOT NULL,
    seen_ms bigint NOT NULL
);
