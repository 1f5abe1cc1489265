"""Query pieces shared by the warehouse readers that bind DB-API ``pyformat`` parameters."""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def ids_in(id_column: str, ids: Sequence[str], per_query: int) -> Iterator[tuple[str, dict]]:
    """``<id_column> IN (...)`` conditions with their parameters, ``per_query`` distinct ids each
    (a replay reads its rejected events back by message id, in bounded queries)."""
    distinct = list(dict.fromkeys(ids))
    for start in range(0, len(distinct), per_query):
        params = {f"id{i}": value for i, value in enumerate(distinct[start:start + per_query])}
        yield f"{id_column} IN ({', '.join(f'%({name})s' for name in params)})", params
