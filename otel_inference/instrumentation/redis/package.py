_instruments = ("redis >= 4.2",)
