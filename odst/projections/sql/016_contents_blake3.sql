-- Contents looked up by hash alone (views.local_content: each content a peer asks for, one per
-- item of a batch request; content_is_live) scanned the whole contents table: serving a
-- catch-up of N packages cost O(N) per package, O(N^2) in all.
CREATE INDEX contents_blake3 ON contents(blake3);
