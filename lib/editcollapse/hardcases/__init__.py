"""Hard cases: HardCF (collapse cases of CounterFact) and HardEdit (constructed)."""
