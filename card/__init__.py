"""The chips, emulated at APDU level: each is a :class:`~svcard.card.runtime.Card` that takes a
command APDU and answers data and a status word, as a real card behind a reader would.

- :mod:`.runtime`: the ISO 7816 card runtime (ATR, SELECT, GET RESPONSE, status words) and the
  base of a card application;
- :mod:`.iep`: the IEP, the PBOC ED/EP purse application (its state, and the routing of its
  commands to :mod:`.iep_commands`, one module per command group);
- :mod:`.psam`: the PSAM, the merchant terminal's purchase security module (its batch group in
  :mod:`.psam_batch`);
- :mod:`.hsm`: the load HSM, the issuer's load keys as a card application;
- :mod:`.keys`: the key records the chips keep;
- :mod:`.storage` and :mod:`.image`: card images on disk (versioned JSON, every write atomic,
  one card per image) and a live card built from one; :mod:`.journal_file`: the append-only
  journal a PSAM writes beside its image, one framed change per step;
- :mod:`.personalise`: a TOML profile in, a card image out;
- :mod:`.applet`: the IEP as a Java Card applet (its source in ``javacard/``): build it, and its
  install parameters and personalisation APDUs from a card image;
- :mod:`.toml_schema`: the pydantic pieces every TOML file shares (profiles, and the servers'
  configurations through host/kit/config.py).

This package imports only :mod:`svcard.protocols` (and itself).
"""
