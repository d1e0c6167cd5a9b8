-- Networking (issue 5).

-- What was set up, as shown in the sandbox object (sandboxd_api::NetworkInfo as JSON): mode,
-- group, address, gateway and the published ports as bound. NULL for rows older than networking.
ALTER TABLE sandboxes ADD COLUMN network TEXT;
-- Bridge mode: the sandbox's host number in the subnet (address = subnet + net_index). Held only
-- while the sandbox is live, so an address is released when the sandbox ends, when its row is
-- deleted, and when reconciliation after a crash marks it lost.
ALTER TABLE sandboxes ADD COLUMN net_index INTEGER;

-- Two live sandboxes never share an address.
CREATE UNIQUE INDEX sandboxes_live_net_index ON sandboxes (net_index)
    WHERE net_index IS NOT NULL AND state IN ('creating', 'running');
