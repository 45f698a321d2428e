"""The request path's vocabulary: entries as read, admitted work, the ops a commit applies
and their outcome codes, the stats line of a batch. Plain data and pure functions only:
the broker, the engine and the admin tools all speak it, and it imports neither of them."""
