"""The mediator's Bitcoin escrow: the one module that imports bitcoinlib, and translates its errors.

An HD wallet (bitcoinlib, segwit) whose database lives in the mediator's data dir (``wallet.sqlite3``; bitcoinlib's
own config, log and cache go to ``bitcoinlib/`` beside it, never to the user's home). Each client account gets
one deposit address (a wallet key named after the account). Payouts are one transaction with many outputs,
signed first and broadcast second, so the caller can record the signed transaction in between: after a crash, the
*same* transaction is broadcast again, which cannot pay anybody twice (its inputs can be spent only once).

Networks (``MEDIATORD_BITCOIN_NETWORK``): ``bitcoinlib_test`` (default) is bitcoinlib's offline test network:
nothing leaves the machine; money appears only through :meth:`Escrow.fund_test_address` (the devnet's and the
tests' "funded client account") and broadcasts go to bitcoinlib's offline test provider. ``testnet`` and
``bitcoin`` use bitcoinlib's public service providers; they are documented, never exercised by tests.

Every method blocks (SQLAlchemy, and HTTP on real networks) and must run on the thread that opened the wallet
(its SQLite session is bound to that thread): :class:`mediatord.payments.Payments` keeps one thread for it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fincryptfs.core.errors import FincryptError, PolicyError

TEST_NETWORK = "bitcoinlib_test"
WALLET_FILE = "wallet.sqlite3"
WALLET_NAME = "fincrypt-mediator"
_import_lock = threading.Lock()


class EscrowError(FincryptError):
    """The wallet or the Bitcoin network failed (not enough funds, provider down, bad transaction)."""


class AddressError(PolicyError):
    """A Bitcoin address is malformed or belongs to another network."""

    status = 422


@dataclass(frozen=True)
class Incoming:
    """An output paid to one of the deposit addresses."""

    txid: str
    vout: int
    address: str
    amount_sat: int
    confirmations: int


@dataclass(frozen=True)
class SignedPayout:
    raw_tx: str  # hex; what a restart broadcasts again
    txid: str
    fee_sat: int
    inputs: int


def _bitcoinlib(data_dir: Path) -> Any:
    """Import bitcoinlib with its data dir inside ours (it reads BCL_DATA_DIR once, at first import)."""
    with _import_lock:
        os.environ.setdefault("BCL_DATA_DIR", str(data_dir / "bitcoinlib"))
        import bitcoinlib.wallets

        return bitcoinlib


def random_test_address(data_dir: Path) -> str:
    """A fresh address on the test network that this wallet does not own (a node's payout address in tests)."""
    _bitcoinlib(data_dir)
    from bitcoinlib.keys import HDKey

    return str(HDKey(network=TEST_NETWORK, witness_type="segwit").address())


def payout_vbytes(inputs: int, outputs: int) -> int:
    """Virtual size of a P2WPKH transaction: 11 vB overhead, 68 per input, 31 per output (+1 change)."""
    return 11 + 68 * inputs + 31 * (outputs + 1)


class Escrow:
    """The mediator's wallet on one network; built complete (opened or created in ``data_dir``)."""

    def __init__(self, data_dir: Path, network: str) -> None:
        self.network = network
        self._lib = _bitcoinlib(data_dir)
        from bitcoinlib.wallets import Wallet, wallet_exists

        db_uri = f"sqlite:///{data_dir / WALLET_FILE}"
        try:
            if wallet_exists(WALLET_NAME, db_uri=db_uri):
                self._wallet = Wallet(WALLET_NAME, db_uri=db_uri)
            else:
                self._wallet = Wallet.create(WALLET_NAME, network=network, db_uri=db_uri, witness_type="segwit")
        except Exception as exc:  # bitcoinlib raises many types; translated here, once
            raise EscrowError(f"cannot open the escrow wallet in {data_dir}: {exc}") from exc
        if self._wallet.network.name != network:
            raise EscrowError(f"the escrow wallet in {data_dir} is on {self._wallet.network.name}, but "
                              f"MEDIATORD_BITCOIN_NETWORK={network}; use a new data dir to switch networks")

    def close(self) -> None:
        """Close the session and its pooled connections (on the wallet's thread: SQLite insists)."""
        session = self._wallet.session
        engine = session.get_bind()
        session.close()
        engine.dispose()

    # --- addresses ------------------------------------------------------------------------------------------

    def new_deposit_address(self, label: str) -> str:
        try:
            return str(self._wallet.new_key(name=label[:80]).address)
        except Exception as exc:
            raise EscrowError(f"cannot derive a deposit address: {exc}") from exc

    def check_address(self, address: object) -> str:
        """The address if it is a valid address of this network; AddressError otherwise."""
        from bitcoinlib.keys import Address

        if not isinstance(address, str) or not 14 <= len(address) <= 90 or not address.isalnum():
            raise AddressError(f"{str(address)[:100]!r} is not a Bitcoin address")
        try:
            parsed = Address.parse(address)
        except Exception as exc:
            raise AddressError(f"{address[:100]!r} is not a valid Bitcoin address: {exc}") from exc
        if parsed.network.name != self.network:
            raise AddressError(f"{address[:100]!r} is a {parsed.network.name} address; this mediator pays on "
                               f"{self.network}")
        return address

    # --- deposits -------------------------------------------------------------------------------------------

    def incoming(self, *, refresh: bool = True) -> list[Incoming]:
        """Unspent outputs paid to deposit addresses (change excluded). ``refresh`` asks the network first
        (not on the test network, whose provider would invent coins for every address)."""
        try:
            if refresh and self.network != TEST_NETWORK:
                self._wallet.utxos_update()
            utxos = self._wallet.utxos(min_confirms=0)
            change = self._change_addresses()
        except Exception as exc:
            raise EscrowError(f"cannot read deposits from the {self.network} network: {exc}") from exc
        return [Incoming(u["txid"], int(u["output_n"]), u["address"], int(u["value"]), int(u["confirmations"]))
                for u in utxos if u["address"] not in change]

    def _change_addresses(self) -> set[str]:
        return set(self._wallet.addresslist(change=1))

    def fund_test_address(self, address: str, amount_sat: int, confirmations: int,
                          txid: str | None = None) -> str:
        """Test network only: make ``amount_sat`` appear at ``address`` (or set a known output's
        confirmations when ``txid`` is given). Returns the txid."""
        if self.network != TEST_NETWORK:
            raise EscrowError(f"funding from nowhere exists only on {TEST_NETWORK}, not on {self.network}")
        self.check_address(address)
        if txid is None:
            txid = hashlib.sha256(os.urandom(32)).hexdigest()
        try:
            self._wallet.utxo_add(address, amount_sat, txid, 0, confirmations=confirmations)
        except Exception as exc:
            raise EscrowError(f"cannot fund {address} on the test network: {exc}") from exc
        return txid

    # --- payouts --------------------------------------------------------------------------------------------

    def _spendable(self, min_confirms: int, credited: Collection[tuple[str, int]]) -> list[dict[str, Any]]:
        """The wallet's change, and the ``credited`` deposits ((txid, vout)) still with ``min_confirms``
        confirmations. Nothing else: an output not credited yet (too few confirmations when the deposits were
        scanned, or paid to an address no account owns) spent by a payout would never be seen, so never
        credited."""
        utxos = self._wallet.utxos(min_confirms=0)
        change = self._change_addresses()
        usable = [u for u in utxos if u["address"] in change
                  or (u["confirmations"] >= min_confirms and (u["txid"], int(u["output_n"])) in credited)]
        return sorted(usable, key=lambda u: (-int(u["value"]), u["txid"], u["output_n"]))

    def spendable_sat(self, min_confirms: int, credited: Collection[tuple[str, int]]) -> int:
        return sum(int(u["value"]) for u in self._spendable(min_confirms, credited))

    def sign_payout(self, outputs: list[tuple[str, int]], fee_sat: int, min_confirms: int,
                    credited: Collection[tuple[str, int]]) -> SignedPayout:
        """One signed (not broadcast) transaction paying every (address, sat) output plus exactly ``fee_sat``
        network fee. Spends the ``credited`` deposits ((txid, vout)) still with ``min_confirms`` confirmations,
        and the wallet's change."""
        for address, value in outputs:
            self.check_address(address)
            if type(value) is not int or value <= 0:
                raise AddressError(f"payout of {value!r} sat to {address} is not a positive integer")
        need = sum(v for _, v in outputs) + fee_sat
        # bitcoinlib adds change of at most the network's dust amount to the fee: money the ledger does not know
        # left the wallet. So inputs are added until the change is nothing or worth keeping, while any are left.
        folded = self._wallet.network.dust_amount
        chosen: list[dict[str, Any]] = []
        for utxo in self._spendable(min_confirms, credited):
            available = sum(int(u["value"]) for u in chosen)
            if available == need or available > need + folded:
                break
            chosen.append(utxo)
        available = sum(int(u["value"]) for u in chosen)
        if available < need:
            raise EscrowError(f"the escrow wallet holds {available} spendable sat; this payout needs {need} sat "
                              "(outputs plus network fee)")
        inputs = [(u["txid"], u["output_n"], u["key_id"], int(u["value"])) for u in chosen]
        try:
            tx = self._wallet.transaction_create(outputs, input_arr=inputs, fee=fee_sat, random_output_order=False)
            tx.sign()
            tx.rawtx = tx.raw()
            verified = tx.verify()
        except Exception as exc:
            raise EscrowError(f"cannot build the payout transaction: {exc}") from exc
        if not verified:
            raise EscrowError("the signed payout transaction does not verify")
        return SignedPayout(tx.raw_hex(), str(tx.txid), int(tx.fee), len(inputs))

    def broadcast(self, raw_tx: str) -> str:
        """Send a signed transaction (again, after a crash: the same bytes) and mark its inputs spent.

        A crash after the broadcast and before the batch was recorded as sent leaves a transaction the network
        already has: sending it again is refused ("already known", "already in block chain"), and the batch
        would stay unsent for ever, every later payout waiting behind it. So a refusal is checked against the
        network: a transaction it knows is sent."""
        try:
            tx = self._wallet.transaction_import_raw(raw_tx)
        except Exception as exc:
            raise EscrowError(f"cannot read the payout transaction: {exc}") from exc
        try:
            tx.send(broadcast=True)
            error = tx.error
        except Exception as exc:  # noqa: BLE001 - bitcoinlib raises many types; translated here, once
            error = str(exc) or type(exc).__name__
        if error:
            if not self._network_knows(str(tx.txid)):
                raise EscrowError(f"the {self.network} network refused the payout transaction: {error}")
            # sent before the crash: the next deposit scan, which refreshes the wallet from the network, sees
            # its inputs spent
        return str(tx.txid)

    def _network_knows(self, txid: str) -> bool:
        """Whether the network's providers have the transaction ``txid`` (mempool or chain); False if they
        cannot say."""
        from bitcoinlib.services.services import Service

        try:
            return bool(Service(network=self.network).gettransaction(txid))
        except Exception:  # noqa: BLE001 - no answer is "not known": the broadcast is retried next pass
            return False
