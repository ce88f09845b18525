-- The Unix uid a request came from (SO_PEERCRED at submit): a vote from
-- that uid is refused unless [admin] allow_self_approval or
-- single_user_demo is set. NULL for requests stored before this column.
-- The agent that made the request is already in `agent`.
ALTER TABLE requests ADD COLUMN requester_uid INTEGER;
