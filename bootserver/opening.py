"""Opening the store and the core from a config: one way, for `serve` (app.init_app) and every CLI command.

Nothing here listens on a socket or needs aiohttp: the CLI's commands open the core without the servers.
"""

from __future__ import annotations

from .booter import Booter
from .config import Config
from .provision.pki import open_keys
from .siblings import Siblings
from .store import Store
from .templates import Templates


def open_store(config: Config, database: str | None = None, *, migrate: bool = True) -> Store:
    """The config's store ([server] database, else data_dir/bootserver.sqlite3), or `database` instead.
    `migrate`: bring its schema up to date now (only `bootserver db migrate` leaves that to later)."""
    return Store(database or config.server.database, replica=config.server.replica, migrate=migrate)


def open_core(config: Config, store: Store | None = None, siblings: Siblings | None = None) -> Booter:
    """The core on `store` (default: the config's, opened here), its keys and templates; `siblings`: the server's
    other processes (serve with workers). Closing the core (`core.close()`) closes the store."""
    store = store or open_store(config)
    try:
        keys = open_keys(store, config.server.data_dir, config.server.secret_key_path)
        return Booter(config, store, Templates(config.server.templates_dir), keys, siblings)
    except BaseException:
        store.close()  # a key file we cannot read must not leave the database connection open
        raise
