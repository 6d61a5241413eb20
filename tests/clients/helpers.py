"""What the client-library tests ask the model for: a trip with nested parts, and a tool that books a
hotel. Every string, list and number is bounded, so that an answer the server constrains to them ends
well inside the tiny model's context (512 tokens), whatever the random weights pick."""

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, Field

from tests.api.servers import V3_MODEL_ID

MODEL_ID = V3_MODEL_ID
MAX_TOKENS = 160  # room for the longest trip that the bounds allow
MAX_NIGHTS = 9

City = Literal["Paris", "Rome"]
Nights = Annotated[int, Field(ge=1, le=MAX_NIGHTS)]


class Address(BaseModel):
    city: str = Field(max_length=12)
    country: str = Field(max_length=12)


class Stop(BaseModel):
    name: str = Field(max_length=12)
    nights: Nights


class Trip(BaseModel):
    """A trip: where it starts and where it stops."""

    title: str = Field(max_length=12)
    start: Address
    stops: list[Stop] = Field(max_length=2)


def book_hotel(city: City, nights: Nights) -> str:
    """Book a hotel room."""
    return f"Booked {nights} nights in {city}."


def is_booking(text: str) -> bool:
    """Whether `text` is what book_hotel returns for arguments within its bounds."""
    return any(text == book_hotel(city, nights) for city in get_args(City) for nights in range(1, MAX_NIGHTS + 1))
