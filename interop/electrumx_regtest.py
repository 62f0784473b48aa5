#!/usr/bin/env python3
"""ElectrumX 2.0 for the interop suite: Bitcoin SV regtest with a fixed fee.

The Bitcoin SV node has no fee estimation RPC (neither `estimatefee` nor
`estimatesmartfee`), so stock ElectrumX answers `blockchain.estimatefee` with
a daemon error, and the Electrum wallet drops a server that does. ElectrumX
has no setting for a fixed fee; its own coins without an estimator declare
`ESTIMATE_FEE` and use a daemon class that returns it. This does the same for
`BitcoinSVRegtest` and hands the class to `Env(coin=...)`, which is the
documented way to run the server with a coin class that is not in its table.
Everything else is configured by the usual environment variables and runs
unchanged (`electrumx.cli.electrumx_server.main` does the same three steps).
"""

import asyncio
import logging
import sys

import electrumx
from electrumx import Controller, Env
from electrumx.lib.coins import BitcoinSVRegtest
from electrumx.lib.util import CompactFormatter, make_logger
from electrumx.server.daemon import Daemon


class FixedFeeDaemon(Daemon):
    """The node's daemon, except that the fee estimate is a constant."""

    async def estimatefee(self, block_count, estimate_mode=None):
        return self.coin.ESTIMATE_FEE


class BitcoinSVRegtestFixedFee(BitcoinSVRegtest):
    DAEMON = FixedFeeDaemon
    # BSV per kB; the value the recorded transcripts in shared/wire show.
    ESTIMATE_FEE = 0.00001


def main():
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(CompactFormatter('%(asctime)s %(levelname)s:%(name)s:%(message)s'))
    logger = make_logger('electrumx', handler=handler, level='INFO')
    logger.info(f'ElectrumX {electrumx.__version__} (interop: BitcoinSV regtest, fixed fee)')
    try:
        env = Env(coin=BitcoinSVRegtestFixedFee)
        logger.setLevel(env.log_level)
        asyncio.run(Controller(env).run())
    except Exception:
        logger.exception('ElectrumX server terminated abnormally')
        return 1
    logger.info('ElectrumX server terminated normally')
    return 0


if __name__ == '__main__':
    sys.exit(main())
